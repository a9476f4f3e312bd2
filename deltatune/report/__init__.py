"""Reports: tables and plots made from run directories and summaries (never from live models)."""
