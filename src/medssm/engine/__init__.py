"""medssm.engine."""
