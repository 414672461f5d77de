"""`lorakit dashboard`: run directories read as objects, and the web page's API."""
