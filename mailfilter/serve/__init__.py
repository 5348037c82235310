"""`mailfilter serve`: config.py (the option table: flags, TOML file, checks),
lifecycle.py (one serving process: start, reload, signals, drain), supervise.py
(the process tree: one process or --workers N)."""
