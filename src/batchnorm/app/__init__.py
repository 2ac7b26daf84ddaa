"""The application: command line, demo, benchmarks. The library never imports it."""
