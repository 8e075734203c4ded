'use strict';
// gradwatch's partial Plotly bundle: the core (scatter, annotations, shapes, colour bars, hover)
// and the two other trace types the dashboard draws. A trace type added to dashboard/figures.py
// must be registered here too (tests/dashboard/test_app.py checks the list).
var Plotly = require('plotly.js/lib/core');
Plotly.register([require('plotly.js/lib/heatmap'), require('plotly.js/lib/treemap')]);
module.exports = Plotly;
