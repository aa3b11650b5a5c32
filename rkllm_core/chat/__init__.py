"""Chat on top of the runtime.

Messages and options, templates, stream parsers, the planner that decides what to send (KV-cache
reuse), the engine, and the system-prompt cache on disk.
"""
