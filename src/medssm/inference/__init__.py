"""medssm.inference."""
