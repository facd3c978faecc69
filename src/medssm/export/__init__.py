"""medssm.export."""
