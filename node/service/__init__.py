"""node.service"""
