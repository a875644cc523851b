"""rdplab: simulated Windows hosts behind a real WinRM endpoint and an RDP endpoint, for testing rdpfix.rdp."""
