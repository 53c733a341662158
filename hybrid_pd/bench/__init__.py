"""``hybrid-pd bench``: rank processes on loopback around the transfer executor, byte
verification against the reference reshard, and a raw contiguous READ as baseline."""
