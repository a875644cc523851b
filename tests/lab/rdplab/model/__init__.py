"""The simulated Windows host: state (one module per concern) and the Windows behaviours that matter for RDP."""
