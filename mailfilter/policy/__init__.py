"""spamcontrol semantics over a loaded bundle: verdict.py (what goes in and out),
profile.py (what a tcp.smtp rule decides), engine.py (one per bundle),
session.py (one per connection), rcpt.py (the RCPT checks, in order), dns.py
and localip.py (what the caller looks up)."""
