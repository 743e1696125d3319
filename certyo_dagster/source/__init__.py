"""Where changes come from: the MongoDB deployment, its clients and indexes."""
