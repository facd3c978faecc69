"""medssm.data."""
