"""Shared test support: real servers on loopback ports (servers), the bundled
data (data), the tamper mutations and fuzz settings (mutations), planted inputs (planted)."""
