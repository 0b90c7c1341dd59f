"""Duet's command line (`duet`). The libraries live in encoders/, registry/, service/, ..."""
