"""Ready recipes, installed as package data so `--recipe NAME` works after `pip install`."""
