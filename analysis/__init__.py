"""The central side: columnar decode, flows, reports, and later the analyzer service."""
