"""node.weights"""
