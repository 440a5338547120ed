"""Storage: the tables, migrations, the event log and the license rows."""
