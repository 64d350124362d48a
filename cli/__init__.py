"""The `mage` console command."""
