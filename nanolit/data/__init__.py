"""Pretraining shards, token loaders, DataModules, chat rendering and the mid-training task mixture."""
