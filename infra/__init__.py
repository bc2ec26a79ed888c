"""Adapters: aiokafka, LanceDB, Redis, embedders, the local service launcher, settings."""
