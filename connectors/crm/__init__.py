"""The CRM target: its connector (``connector``) and a reference CRM server (``server``)."""
