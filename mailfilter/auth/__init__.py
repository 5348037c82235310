"""SMTP AUTH: SASL exchanges, verifiers, the user database, checkpassword tools, auth syslog."""
