"""Two router modules sharing one Router object (b extends the router it imports from a)."""
