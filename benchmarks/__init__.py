"""Speed benchmarks (`gencls bench decoding|train`): each prints ratios measured in one run."""
