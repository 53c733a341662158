"""Streamlit app, Plotly figures and read-only queries over the spans database."""
