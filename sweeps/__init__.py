"""Recipe → plan → launch → ledger → aggregate. Installed as `umv2cli.sweeps` (PyPI has a
top-level `sweeps`). The stages arrive with the sweep issue; `model.accounting.account` is the
per-run accounting the planner will call."""
