"""flash-attn wheels for the exact environment: key, cache, official release lookup, source build, verification.

``resolve.resolve_wheel`` is the entry point: cache -> official prebuilt wheel -> source build.
"""
