"""Test harnesses, drivers, fake peers and the DNS responder shared by the test groups."""
