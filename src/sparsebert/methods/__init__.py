"""Pruning methods: each a composition of target, criterion, allocation and schedule."""
