"""Study: which cells to run (plan), running one cell (run), aggregating and reporting the results (report)."""
