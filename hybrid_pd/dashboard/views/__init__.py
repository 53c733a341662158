"""Dashboard pages; each module is run as a script by ``st.navigation`` (see app.py)."""
