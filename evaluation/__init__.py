"""Evaluation harness for MAGE: front metrics (`metrics`), the compared methods (`methods`),
`mage eval` (`run`), alpha/beta tuning (`tune`) and the quadratic theory checks (`theory`).

Nothing is imported here, so that the decoding-only parts (`methods`) load without the
metric and plotting dependencies."""
