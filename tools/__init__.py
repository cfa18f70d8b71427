"""README generators: the API table, the results, the benchmarks, the layout."""
