"""Tools that check this package against TRL itself: `run_trl_dpo_tests.py` and its local stand-ins."""
