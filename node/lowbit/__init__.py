"""node.lowbit"""
