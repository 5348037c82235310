"""spamcontrol semantics over a loaded bundle (PolicyEngine, SessionPolicy) and the DNS checks."""
