"""node.presence"""
