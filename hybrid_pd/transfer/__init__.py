"""The NIXL code that moves bytes: agents, registration, prepared views, reads by index
list, polling, the stall guard and leases, and the handshake wire format.  No vLLM
imports: the vLLM connector and ``hybrid-pd bench`` both drive it."""
