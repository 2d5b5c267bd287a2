"""node.security"""
