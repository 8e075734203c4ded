"""gradwatch dashboard (Dash + Plotly), served by the server process; arrives in a later issue."""
