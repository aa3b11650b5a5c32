"""Models by name: the file-name grammar, the registry file, the registry and the model manager."""
