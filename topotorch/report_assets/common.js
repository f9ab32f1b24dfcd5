
const errors=[];window.addEventListener('error',e=>{errors.push(String(e.message));document.body.dataset.errors=errors.length;});
const NS='http://www.w3.org/2000/svg';
function el(tag,attrs,parent){const e=document.createElementNS(NS,tag);for(const k in attrs)e.setAttribute(k,attrs[k]);if(parent)parent.appendChild(e);return e;}
function fmt(v){if(v===null||v===undefined)return '–';if(typeof v!=='number')return String(v);const a=Math.abs(v);
 return (a!==0&&(a<1e-3||a>=1e5))?v.toExponential(3):(+v.toPrecision(4)).toString();}
function lineChart(parent,title,xs,series,opts){opts=opts||{};const W=300,H=170,L=46,R=8,T=18,B=22;
 const svg=el('svg',{width:W,height:H,viewBox:`0 0 ${W} ${H}`,class:'chart'},parent);
 el('text',{x:L,y:12,'font-weight':'bold'},svg).textContent=title;
 const tr=v=>opts.log?Math.log10(Math.max(v,1e-12)):v;let lo=Infinity,hi=-Infinity,x0=Infinity,x1=-Infinity;
 series.forEach(s=>s.ys.forEach((y,i)=>{if(y===null||!isFinite(y))return;const t=tr(y);lo=Math.min(lo,t);hi=Math.max(hi,t);
  x0=Math.min(x0,s.xs[i]);x1=Math.max(x1,s.xs[i]);}));
 if(!isFinite(lo)){el('text',{x:L,y:H/2},svg).textContent='no data';return svg;}
 if(hi===lo){hi+=1;lo-=1;}if(x1===x0)x1+=1;
 const sx=x=>L+(x-x0)/(x1-x0)*(W-L-R),sy=y=>T+(1-(tr(y)-lo)/(hi-lo))*(H-T-B);
 el('rect',{x:L,y:T,width:W-L-R,height:H-T-B,fill:'none',stroke:'#ccc'},svg);
 [lo,hi].forEach((t,i)=>{el('text',{x:L-3,y:i?T+8:H-B,'text-anchor':'end'},svg).textContent=fmt(opts.log?Math.pow(10,t):t);});
 el('text',{x:L,y:H-6},svg).textContent=fmt(x0);el('text',{x:W-R,y:H-6,'text-anchor':'end'},svg).textContent=fmt(x1)+' steps';
 series.forEach((s,k)=>{const pts=[];s.ys.forEach((y,i)=>{if(y!==null&&isFinite(y))pts.push(sx(s.xs[i]).toFixed(1)+','+sy(y).toFixed(1));});
  el('polyline',{points:pts.join(' '),fill:'none',stroke:s.color||'#1f5fbf','stroke-width':1.4},svg);
  if(s.name){el('text',{x:W-R-4,y:T+12+12*k,'text-anchor':'end',fill:s.color},svg).textContent=s.name;}});
 return svg;}
function table(parent,head,rows){const t=document.createElement('table');const tr=t.insertRow();
 head.forEach(h=>{const th=document.createElement('th');th.textContent=h;tr.appendChild(th);});
 rows.forEach(r=>{const row=t.insertRow();r.forEach(c=>{row.insertCell().textContent=typeof c==='number'?fmt(c):c;});});parent.appendChild(t);return t;}
