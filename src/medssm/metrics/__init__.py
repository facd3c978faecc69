"""medssm.metrics."""
