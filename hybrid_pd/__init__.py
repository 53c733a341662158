"""hybrid-pd: disaggregated prefill/decode for hybrid SSM + attention models."""
