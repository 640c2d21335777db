"""Speculative decoding: cheap proposals for a request's next tokens, verified by one forward
of the target model over all of them (see docs/architecture.md, "Speculative decoding")."""
