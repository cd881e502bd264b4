"""Shared test support: real servers on loopback ports (servers), the bundled
data (data), the tamper mutations (mutations), the hypothesis settings (fuzz), raw
database access and dropped triggers (db), receipts with placeholder fields (receipts),
signed ``.kolm`` files and the zip surgery that breaks them (artifacts), planted inputs
(planted), an OpenAI-compatible endpoint (openai), a tiny random causal LM (lm)."""
