"""Arrow schemas, readers and the task registry: the plain data that crosses every boundary."""
