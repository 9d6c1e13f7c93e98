"""Generated gRPC stubs of herd's API (proto/herd/v1/inference.proto). Regenerate with `make proto`; do not edit."""
