"""Who may log in (users file, password schemes) and how failed logins are slowed down."""
