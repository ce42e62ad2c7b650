"""A small synthetic visual-QA task and the scripts that train, evaluate and ship a small Dimple on it."""
