"""Getting records to Certyo: the HTTP client, the resource, and shipping a window."""
